from mnist_pipeline.cli import main

raise SystemExit(main())
