"""The engine's HTTP API: app.py assembles the routers (health, OpenAI, admin), errors.py the error shape,
limits.py the body limit, chat.py the chat-template tokenization."""
