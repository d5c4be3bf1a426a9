// The API docs (/docs): Swagger UI from this server's own copy, started here rather than in an inline script,
// which the Content-Security-Policy forbids. The URL is relative, so the docs work behind a path prefix.
"use strict";

window.ui = SwaggerUIBundle({ url: "openapi.json", dom_id: "#swagger-ui", deepLinking: false });
