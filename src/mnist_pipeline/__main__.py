from mnist_pipeline.cli import entry

entry()
