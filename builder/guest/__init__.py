"""Programs that run inside the appliance, sent over SSH: the standard library only."""
