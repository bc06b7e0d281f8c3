"""Cross-cutting behaviour of every RPC, one module per concern, composed in server/app.py."""
