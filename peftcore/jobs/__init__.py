"""What the `peftcore` command does: recipes, bases and adapter folders, run folders, the train,
eval, generate and merge jobs."""
