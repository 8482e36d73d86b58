"""Helper scripts the distributed tests run in subprocesses (not tests themselves)."""
