"""GPU side: training task, subprocess runner, metrics parser, GPU probe."""
