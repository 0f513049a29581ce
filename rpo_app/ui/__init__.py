"""The Gradio app: one module per tab, all sharing one AppContext."""
