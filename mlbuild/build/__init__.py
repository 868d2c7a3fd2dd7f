"""One build and what it would do: `runner`, `query`, their `results`, the workspace `lock`."""
