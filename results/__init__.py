"""What a finished (or running) search is read back as: report, plots, export, predict, leaderboard."""
