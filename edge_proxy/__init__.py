"""The edge proxy: OpenAI-compatible API that tokenizes, embeds and cloaks on the user's machine."""
