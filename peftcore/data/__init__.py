"""Training records: reading and checking them, templates and loss masks, augmentation, the data report."""
