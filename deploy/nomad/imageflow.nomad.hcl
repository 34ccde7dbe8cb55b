# ImageFlow on Nomad: control plane, tool services and Triton on a GPU client (nvidia device plugin).
# Images from deploy/docker/*.Dockerfile. Parsed in `make test` (python-hcl2).
# GPU sharing: only Triton reserves the GPU (`device "nvidia/gpu"`); the detection task sends its inferences to Triton,
# so both use that one card through Triton's scheduler. Nomad does not time-slice a device between tasks: a second
# GPU consumer needs its own card or a MIG slice (the device plugin lists MIG instances as separate devices).
job "imageflow" {
  datacenters = ["dc1"]

  group "control-plane" {
    network { port "grpc" { static = 50051 } }
    task "imageflow-server" {
      driver = "docker"
      config { image = "imageflow-server:0.2.0" ports = ["grpc"] }
      env {
        IMAGEFLOW_DATABASE_URL     = "postgresql://imageflow@postgres.service.consul:5432/imageflow"
        IMAGEFLOW_EMBEDDED_TOOLS   = "false"
        IMAGEFLOW_TRITON_URL       = "triton.service.consul:8001"
        IMAGEFLOW_LLM_API_KEY_FILE = "/secrets/llm-api-key"
        IMAGEFLOW_HOST             = "0.0.0.0"
        IMAGEFLOW_API_KEYS_FILE    = "/secrets/api-keys"
        IMAGEFLOW_TLS_CERT_FILE    = "/secrets/tls.crt"
        IMAGEFLOW_TLS_KEY_FILE     = "/secrets/tls.key"
        IMAGEFLOW_TOOL_ALLOWLIST   = "*.service.consul"
        IMAGEFLOW_RATE_LIMIT_PER_S = "50"
      }
      vault { policies = ["imageflow"] }
      # Secrets arrive as files in the task's secrets/ directory (never in env or args): from Vault when it is set
      # up, the LLM key from a Nomad variable otherwise. api-keys holds `ROLE sha256:HEX [NAME]` lines.
      template {
        data        = "{{ with nomadVar \"nomad/jobs/imageflow\" }}{{ .llm_api_key }}{{ end }}"
        destination = "secrets/llm-api-key"
      }
      template {
        data        = "{{ with secret \"kv/data/imageflow/api-keys\" }}{{ .Data.data.lines }}{{ end }}"
        destination = "secrets/api-keys"
      }
      template {
        data        = "{{ with secret \"pki/issue/imageflow\" \"common_name=imageflow.service.consul\" }}{{ .Data.certificate }}{{ end }}"
        destination = "secrets/tls.crt"
      }
      template {
        data        = "{{ with secret \"pki/issue/imageflow\" \"common_name=imageflow.service.consul\" }}{{ .Data.private_key }}{{ end }}"
        destination = "secrets/tls.key"
        perms       = "0400"
      }
      kill_timeout = "30s"
      service {
        name = "imageflow"
        port = "grpc"
        check { type = "tcp" interval = "10s" timeout = "2s" }  # TLS port: Consul's gRPC check would speak plaintext
      }
    }
  }

  group "tools" {
    count = 2
    network {
      port "resize" { to = 50061 }
      port "filter" { to = 50062 }
      port "detection" { to = 50063 }
    }
    task "resize" {
      driver = "docker"
      config { image = "imageflow-tools:0.2.0" args = ["resize", "--port", "50061"] ports = ["resize"] }
      service { name = "imageflow-resize" port = "resize" check { type = "grpc" interval = "10s" timeout = "2s" } }
    }
    task "filter" {
      driver = "docker"
      config { image = "imageflow-tools:0.2.0" args = ["filter", "--port", "50062"] ports = ["filter"] }
      service { name = "imageflow-filter" port = "filter" check { type = "grpc" interval = "10s" timeout = "2s" } }
    }
    task "detection" {
      driver = "docker"
      config { image = "imageflow-tools:0.2.0" args = ["detection", "--port", "50063"] ports = ["detection"] }
      env { IMAGEFLOW_TRITON_URL = "triton.service.consul:8001" }
      service { name = "imageflow-detection" port = "detection" check { type = "grpc" interval = "10s" timeout = "2s" } }
    }
  }

  group "triton" {
    network {
      port "grpc" { static = 8001 }
      port "metrics" { static = 8002 }
    }
    task "tritonserver" {
      driver = "docker"
      config {
        image = "imageflow-triton:0.2.0"
        args  = ["tritonserver", "--model-repository=/models"]
        ports = ["grpc", "metrics"]
      }
      resources {
        device "nvidia/gpu" { count = 1 }
      }
      service { name = "triton" port = "grpc" check { type = "grpc" interval = "10s" timeout = "2s" } }
    }
  }
}
