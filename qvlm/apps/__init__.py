"""Applications built on the library: the demo (`qvlm demo`) and its packaged prompts."""
