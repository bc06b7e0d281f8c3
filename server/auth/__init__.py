"""The Auth feature: principals, login, tokens, auth sessions."""
