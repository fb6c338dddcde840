"""Export fusion models to ONNX (dynamic batch, H, W), verify them, write artifacts."""
