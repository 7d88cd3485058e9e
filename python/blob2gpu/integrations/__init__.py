"""What other software calls: torch modules, torch.distributed fan-out, cold starts."""
