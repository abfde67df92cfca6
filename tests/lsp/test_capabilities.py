"""The server's advertised capabilities, as a pygls client receives them in the InitializeResult, stay
as recorded in tests/golden/lsp-capabilities.json. A deliberate change regenerates the file with
DS4_UPDATE_GOLDEN=1 and commits it with the change."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

from lsprotocol import converters, types
from pygls.lsp.client import LanguageClient

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "lsp-capabilities.json"


async def advertised(script: Path) -> dict:
    client = LanguageClient("ds4-capabilities-test", "1")
    await client.start_io(sys.executable, "-m", "tests.lsp.scripted_server", str(script))
    try:
        params = types.InitializeParams(capabilities=types.ClientCapabilities())
        result = await client.initialize_async(params)
        await client.shutdown_async(None)
        client.exit(None)
    finally:
        await asyncio.wait_for(client.stop(), 30)
    return converters.get_converter().unstructure(result.capabilities)


def test_advertised_capabilities_match_the_golden_file(tmp_path):
    script = tmp_path / "script.json"
    script.write_text("{}")
    text = json.dumps(asyncio.run(advertised(script)), indent=2, sort_keys=True) + "\n"
    if os.environ.get("DS4_UPDATE_GOLDEN") == "1":
        GOLDEN.write_text(text)
    assert text == GOLDEN.read_text()
