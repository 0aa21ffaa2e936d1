"""navtwist's plugin package, searched with twisted.plugin.getPlugins.

Like C{twisted.plugins}, it also spans every C{navtwist/plugins/} directory
(without an C{__init__.py}) that other installed distributions ship, so a
third-party plugin needs no change to navtwist.
"""
from twisted.plugin import pluginPackagePaths

__path__.extend(pluginPackagePaths(__name__))  # noqa: F821
__all__: list[str] = []
