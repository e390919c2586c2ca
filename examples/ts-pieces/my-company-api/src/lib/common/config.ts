// Environment-specific configuration, as in the private-pieces guide. `baseUrl` (a
// connection field) overrides the environment's URL, e.g. to point at a local mock.
const URLS: Record<string, string> = {
  prod: 'https://api.company.com',
  staging: 'https://api-staging.company.com',
  dev: 'http://localhost:3000',
};

export function getApiUrl(environment: string, baseUrl?: string): string {
  if (baseUrl) return baseUrl.replace(/\/+$/, '');
  return URLS[environment] ?? URLS['dev'];
}

export function getApiVersion(environment: string): string {
  return environment === 'prod' ? 'v2' : 'v1';
}

export type CompanyAuth = { apiKey: string; environment: string; baseUrl?: string };

/** `GET`/`POST` against the API with the connection's key; throws with the status on failure. */
export async function callApi<T>(
  auth: CompanyAuth,
  path: string,
  init: { method?: string; body?: unknown; headers?: Record<string, string> } = {},
): Promise<{ body: T; headers: Headers }> {
  const url = `${getApiUrl(auth.environment, auth.baseUrl)}/${getApiVersion(auth.environment)}${path}`;
  const response = await fetch(url, {
    method: init.method ?? 'GET',
    headers: {
      Authorization: `Bearer ${auth.apiKey}`,
      'Content-Type': 'application/json',
      ...init.headers,
    },
    body: init.body === undefined ? undefined : JSON.stringify(init.body),
  });
  if (!response.ok) {
    const error = new Error(`HTTP ${response.status}: ${await response.text()}`) as Error & { status: number };
    error.status = response.status;
    throw error;
  }
  return { body: (await response.json()) as T, headers: response.headers };
}
