"""Export stage: checkpoint.pt -> model.onnx with the recurrent state as explicit input and output."""
