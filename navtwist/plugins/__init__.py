"""Built-in navtwist plugins, discovered with twisted.plugin.getPlugins."""
