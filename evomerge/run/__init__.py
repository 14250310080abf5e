"""Running a search: run directories, workers, the ask/evaluate/tell loop, resume, export."""
