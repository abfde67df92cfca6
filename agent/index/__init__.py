"""The repository index: file catalog, tree-sitter tags, SQLite storage, incremental and live updates."""
