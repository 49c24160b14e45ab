"""Generated puzzle tasks (pure numpy, no download) for reasoning experiments such as TRM."""
