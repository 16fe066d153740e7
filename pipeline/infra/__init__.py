"""Plumbing: errors, config, devices, paths, artifacts, tracking (imports nothing else of pipeline)."""
