"""The Session feature: agent sessions and their lifecycle, tasks, approvals."""
