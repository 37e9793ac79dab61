"""The DART study: arms at equal steps and trainable parameters, paired statistics, a markdown report."""
