"""`ds4-agent lsp`: the language server, on standard input and output or on a TCP port."""

from __future__ import annotations

import sys

from ds4.agent.cli import DONE, USAGE


def add_parser(sub) -> None:
    lsp = sub.add_parser(
        "lsp",
        epilog="Settings come from the client's initializationOptions: model or endpoint, apiKey, budget, "
        "testCommand (see examples/vscode-ds4 and examples/nvim).",
    )
    lsp.add_argument("--tcp", metavar="HOST:PORT", default=None, help="listen on TCP instead of stdio")
    lsp.add_argument("--log-file", default=None, help="the server log (stdout is the protocol)")


def run(args) -> int:
    import logging

    if args.log_file:
        logging.basicConfig(filename=args.log_file, level=logging.INFO)
    from ds4.lsp.server import create_server

    server = create_server()
    if args.tcp:
        host, _, port = args.tcp.rpartition(":")
        if not host or not port.isdigit():
            print(f"error: --tcp wants HOST:PORT, got {args.tcp!r}", file=sys.stderr)
            return USAGE
        server.start_tcp(host, int(port))
    else:
        server.start_io()
    return DONE
