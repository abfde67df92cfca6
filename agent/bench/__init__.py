"""The agent's benchmarks, each next to a peer: the index (index.py), the packer (pack.py), the HTTP
service under concurrent clients (serve.py)."""
