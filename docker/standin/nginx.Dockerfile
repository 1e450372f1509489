# CI stand-in for the load balancer's nginx image (CHARRNN_LB_IMAGE) when no registry can be reached:
# Debian bookworm's nginx, laid out as the official image is where docker-compose.yml relies on it
# (the site file mounted at /etc/nginx/conf.d/default.conf, logs on stdout/stderr, in the foreground).
ARG BASE=charrnn-standin/debian:bookworm
FROM ${BASE}

ENV DEBIAN_FRONTEND=noninteractive

# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends nginx \
    && rm -rf /var/lib/apt/lists/* /etc/nginx/sites-enabled/default \
    && ln -sf /dev/stdout /var/log/nginx/access.log \
    && ln -sf /dev/stderr /var/log/nginx/error.log
EXPOSE 80
STOPSIGNAL SIGQUIT
CMD ["nginx", "-g", "daemon off;"]
