"""The language server (pygls) for VS Code and Neovim: server.py (state, transports), handlers.py (thin
handlers), and the features they call: symbols.py, completion.py, fix.py, edits.py."""
