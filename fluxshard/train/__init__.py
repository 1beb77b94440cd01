"""Training the demo YOLO11 weights on synthetic scenes: losses (``loss``), data (``data``), the
resumable loop (``trainer``) and the ``fluxshard train-demo`` verb (``cli``)."""
