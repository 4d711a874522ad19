"""A client's local round: `FederatedMoETrainer` and its callbacks (expert token counts)."""
