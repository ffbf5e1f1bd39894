"""Images on disk -> arrays: class folders, image decoding, the decoded set, batches,
augmentation and the data checks; ``prepare.prepare_data`` composes them into the
``PreparedData`` every training starts from. No module here imports training, inference or
the CLI."""
