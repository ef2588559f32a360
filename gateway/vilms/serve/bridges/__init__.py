"""API translators: turn one OpenAI API into another an engine speaks (Responses over chat)."""
