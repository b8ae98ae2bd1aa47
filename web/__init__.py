"""Web front ends of EmoLoRA: panel/ is the Gradio training panel."""
