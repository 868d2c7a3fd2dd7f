"""What the user reads: `messages` (the words), `report` and `progress`, `history`, `dag`."""
