"""The Crypto feature: per-tenant keys, envelope encryption, signing, MACs."""
