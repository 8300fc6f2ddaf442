from mnist_pipeline.warm import entry

entry()
