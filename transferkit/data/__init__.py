"""Images on disk -> arrays: class folders, image decoding, the decoded set, batches,
augmentation and the data checks. No module here imports training, inference or the CLI."""
