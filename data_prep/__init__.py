"""Dataset builders: synthetic faces (default, offline) and 300-W (manual download)."""
