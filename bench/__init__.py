"""Load benchmark of the AI Chat Service (`make bench`, entry point `bench.run`).

The service runs under its real gunicorn.conf.py on PostgreSQL against the fake
OpenAI-compatible server of tests/fake_llm.py; a forward-only WSGI app under the
same settings is the floor it is compared against. Figures go to RESULTS.md.
"""
