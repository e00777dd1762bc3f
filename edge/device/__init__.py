"""On-device benchmark scripts: each file is copied to a device alone and imports nothing from densekit."""
