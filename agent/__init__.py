"""The agent side of ds4: the repository index, the packer, the patcher, the fix loop and its faces (the
CLI in cli/, the HTTP API in api/); the language server over it is ds4.lsp."""
