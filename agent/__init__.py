"""The agent side of ds4: the CLI today; index, packer, patcher, fix loop and HTTP API as they land."""
