"""The serve wing (the gateway at run time): app, routes, engines, embeddings, media, fetch, security."""
