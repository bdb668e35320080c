"""The toy world: synthetic shapes whose every attribute is known, its oracle, and the tiny model's trainer."""
