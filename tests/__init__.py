"""brandmon's test suite. A regular package, so a dependency's top-level `tests/` folder (tf2onnx
installs one into site-packages) can never merge with or shadow it."""
