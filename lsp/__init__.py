"""The language server (pygls) for VS Code and Neovim: thin handlers over ds4.agent (the LSP issue)."""
