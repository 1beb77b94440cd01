"""Training the demo YOLO11 weights on synthetic scenes: losses (``loss``), data (``data``), the
resumable loop (``trainer``); the ``fluxshard train-demo`` verb is fluxshard.tools.train_demo."""
