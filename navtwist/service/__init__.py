"""The service shell around the data path: twistd plugin, reload, drain,
admin endpoint, metrics, logs and the C{navtwist} command line."""
