"""Plumbing: errors, config, devices, paths, artifacts, tracking, data (imports nothing else of pipeline)."""
