import { createAction, Property } from '@activepieces/pieces-framework';
import { companyAuth } from '../auth';
import { callApi, CompanyAuth } from '../common/config';

export const createTicketAction = createAction({
  auth: companyAuth,
  name: 'create_ticket',
  displayName: 'Create Ticket',
  description: 'Create a new support ticket',
  props: {
    title: Property.ShortText({ displayName: 'Title', description: 'Ticket title', required: true }),
    description: Property.LongText({ displayName: 'Description', description: 'Detailed description', required: true }),
    priority: Property.StaticDropdown({
      displayName: 'Priority',
      required: false,
      defaultValue: 'medium',
      options: {
        options: [
          { label: 'Low', value: 'low' },
          { label: 'Medium', value: 'medium' },
          { label: 'High', value: 'high' },
          { label: 'Critical', value: 'critical' },
        ],
      },
    }),
  },
  async run(context) {
    const { title, description, priority } = context.propsValue;
    const auth = context.auth.props as unknown as CompanyAuth;
    const { body } = await callApi<{ id: string; created_at: string; url: string }>(auth, '/tickets', {
      method: 'POST',
      body: { title, description, priority: priority ?? 'medium' },
    });
    // Remember the last ticket filed by this flow, as the guide's piece does.
    await context.store.put('last_ticket', body.id);
    return body;
  },
});
