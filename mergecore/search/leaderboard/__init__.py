"""`mergecore leaderboard`: every data-free merge and the searches, ranked on validation in a
time budget, the top K scored on test (`run.py` describes the run, its files and events)."""
